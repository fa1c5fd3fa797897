"""The stack slidechat runs on: transformers 5 under stock xtuner 0.2.0 through one start-up shim.

Expectations come from the packages themselves: what xtuner's and mmengine's own modules import at
start-up (``xtuner/utils/handle_moe_load_and_save.py``, ``mmengine/_strategy/deepspeed.py``), what
pip's resolver reports, and what setuptools puts in a wheel.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _py(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, **env), cwd=str(REPO))


def test_pip_check_reports_only_the_two_packages_installed_without_their_pins() -> None:
    res = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True, timeout=300)
    lines = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.strip()]
    import timm
    import transformers
    assert transformers.__version__.startswith("5."), transformers.__version__
    # the documented conflicts (README "The stack"): xtuner 0.2.0's exact transformers pin, and the test
    # reference torchscale 0.3.0's pins of timm 0.6.13 and fairscale (tools/setup_env.sh)
    assert sorted(lines) == sorted([
        f"xtuner 0.2.0 has requirement transformers==4.48.0, but you have transformers {transformers.__version__}.",
        "torchscale 0.3.0 requires fairscale, which is not installed.",
        f"torchscale 0.3.0 has requirement timm==0.6.13, but you have timm {timm.__version__}."]), lines


def test_start_up_hook_is_installed_beside_the_packages() -> None:
    purelib = Path(sysconfig.get_paths()["purelib"])
    pth = purelib / "slidechat-stack-compat.pth"
    assert pth.is_file(), f"{pth} missing: reinstall slidechat (pip install -e .)"
    assert pth.read_text().strip() == (REPO / "slidechat-stack-compat.pth").read_text().strip()


def test_stock_xtuner_imports_only_through_the_shim() -> None:
    probe = "import xtuner.tools.train, xtuner.tools.test; print('ok')"
    ok = _py(probe)
    assert ok.returncode == 0 and ok.stdout.strip().endswith("ok"), ok.stderr[-2000:]
    # without the shim the same import fails on the name transformers 5 removed: the test can fail
    bare = _py(probe, SLIDECHAT_NO_STACK_COMPAT="1")
    assert bare.returncode != 0 and "is_safetensors_available" in bare.stderr


def test_removed_deepspeed_optimizers_register_but_refuse_to_be_built() -> None:
    code = ("from mmengine._strategy.deepspeed import register_deepspeed_optimizers as r\n"
            "names = r(); print(','.join(names))\n"
            "from deepspeed.runtime.fp16.onebit import OnebitAdam\n"
            "try:\n    OnebitAdam([])\nexcept RuntimeError as e:\n    print('refused:', e)\n"
            "import torch; print('bf16', torch.cpu.is_bf16_supported())\n")
    res = _py(code)
    assert res.returncode == 0, res.stderr[-2000:]
    out = res.stdout
    assert "DeepSpeedCPUAdam" in out and "ZeroOneAdam" in out
    assert "refused: OnebitAdam was removed in DeepSpeed 0.19" in out
    assert "bf16 False" in out


def test_shim_leaves_names_that_exist_alone() -> None:
    import slidechat_compat
    import types
    mod = types.ModuleType("transformers.utils")
    own = lambda: "own"  # noqa: E731
    mod.is_safetensors_available = own
    slidechat_compat.PATCHES["transformers.utils"](mod)
    assert mod.is_safetensors_available is own


def test_wheel_carries_the_start_up_hook_at_its_root(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                          "-w", str(tmp_path), str(REPO)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    wheel = next(tmp_path.glob("slidechat-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "slidechat-stack-compat.pth" in names and "slidechat_compat.py" in names
