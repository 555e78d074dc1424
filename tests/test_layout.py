import pkgutil
import subprocess
import sys

import ood_core


def test_ood_core_never_imports_prefect():
    modules = [m.name for m in pkgutil.walk_packages(ood_core.__path__, "ood_core.")]
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "import flows.cli\n"
        "print('prefect' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
    assert "ood_core.stages.finetune" in modules and "ood_core.models.diffusion" in modules
