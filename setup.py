"""vldeformer_jax: VLDeformer (vision-language decomposed transformer) in JAX/Flax."""
import setuptools

setuptools.setup(
    name="vldeformer_jax",
    version="0.1.0",
    description="VLDeformer: decompose a vision-language transformer into fast single-modality encoders (JAX/Flax).",
    packages=setuptools.find_packages(include=["vldeformer_jax", "vldeformer_jax.*"]),
    package_data={"vldeformer_jax.model": ["assets/*.txt"]},
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.7.0",
        "flax>=0.11.0",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11.0",
        "tensorflow-datasets>=4.9.9",
        "array_record>=0.7",
        "grain>=0.2.12",
        "transformers>=4.50",  # the tokenizer only: transformers 5 has no Flax models
        "numpy>=1.26",
        "ml_collections>=1.0",
        "absl-py>=2.0",
        "tqdm>=4.66",
        "safetensors>=0.4",
        "tensorboardX>=2.6",  # TensorBoard event files without TensorFlow
        "matplotlib>=3.8",
    ],
    extras_require={
        # torch reads .bin/.cpkt checkpoints and .pt caption files, and is the parity reference in tests.
        # Pinned: the CPU wheel of this version is what the project's machines install offline.
        "torch": ["torch==2.13.0"],
        # faiss: the CPU index backend (`launch/index.py build --backend=faiss`) and the search benchmark's reference.
        "faiss": ["faiss-cpu>=1.8"],
        "test": ["torch==2.13.0", "pytest>=8", "pytest-xdist>=3.5", "scikit-learn>=1.4", "faiss-cpu>=1.8"],
        "bench": ["torch==2.13.0", "faiss-cpu>=1.8"],
    },
)
