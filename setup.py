from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="lucatrain",
    version="0.1.0",
    description="DeepSpeed pretraining of gene/protein language models (LucaOne/LucaVirus style) "
    "with exact sample-id resume.",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["lucatrain", "lucatrain.*"]),
    package_data={"lucatrain": ["configs/*.yaml"]},
    install_requires=[
        # torch is pinned by the install commands in the README (a CPU wheel lies on disk);
        # any 2.x satisfies us, so an existing CUDA build is kept.
        "torch>=2.3",
        "deepspeed>=0.15",
        "transformers>=4.40",
        "datasets>=2.19",
        "pyarrow>=14",
        "xxhash>=3",
        "numpy>=1.24",
        "numba>=0.59",
        "biopython>=1.80",
        "safetensors>=0.4",
        "peft>=0.10",
        "tensorboard>=2.14",
        "pyyaml>=6",
        "tqdm>=4.60",
        # the contrastive family: retrieval evaluation, CLIBD's HDF5 layout, specimen images
        "faiss-cpu>=1.7",
        "h5py>=3",
        "Pillow>=9",
        "sentencepiece>=0.1.99",  # the clibd text tokenizer trained at start-up
        "tifffile>=2023.1",  # multispectral TIFF stacks (simclr)
        "matplotlib>=3.7",  # `lucatrain plot`
    ],
    # bitsandbytes: QLoRA's 4-bit base weights (`clibd.qlora`); in `test` so that the suite runs that path
    # on bitsandbytes' CPU reference kernels.
    # timm: `clibd.image.arch=timm` and the simclr backbones it names; it needs a torchvision built for the installed torch.
    extras_require={"qlora": ["bitsandbytes>=0.48"], "timm": ["timm>=1.0", "torchvision"], "wandb": ["wandb>=0.16"],
                    "test": ["pytest>=7", "bitsandbytes>=0.48", "wandb>=0.16"]},
    entry_points={"console_scripts": ["lucatrain=lucatrain.cli:main"]},
)
