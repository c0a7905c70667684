"""Everything is in pyproject.toml except one file pyproject cannot express: vaclm-hook.pth.

The .pth goes to the root of site-packages, in ordinary and in editable (`pip install -e .`) wheels.
Python runs its line at start-up; src/_vaclm_hook.py says what it does (register vaclm's
transformers quantizer when transformers' quantizers are imported, so vaclm folders load without
`import vaclm`, at no start-up cost otherwise).
"""

import base64
import hashlib
import zipfile
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH_NAME = "vaclm-hook.pth"  # sorts after setuptools' "__editable__.*.pth", which puts src/ on sys.path
PTH_LINE = b"import _vaclm_hook\n"


class build_py_with_pth(build_py):
    def run(self):
        super().run()
        if not self.editable_mode:  # an editable wheel gets it in editable_wheel_with_pth
            Path(self.build_lib, PTH_NAME).write_bytes(PTH_LINE)

    def get_outputs(self, include_bytecode=True):
        extra = [] if self.editable_mode else [str(Path(self.build_lib, PTH_NAME))]
        return [*super().get_outputs(include_bytecode), *extra]


class editable_wheel_with_pth(editable_wheel):
    """The editable wheel only holds setuptools' own .pth; add ours, with its RECORD line."""

    def run(self):
        super().run()
        for wheel in Path(self.dist_dir).glob("*.editable-*.whl"):
            add_to_wheel(wheel, PTH_NAME, PTH_LINE)


def add_to_wheel(wheel: Path, name: str, data: bytes) -> None:
    with zipfile.ZipFile(wheel) as zf:
        if name in zf.namelist():
            return
        record = next(n for n in zf.namelist() if n.endswith(".dist-info/RECORD"))
        entries = {n: zf.read(n) for n in zf.namelist()}
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    record_text = entries.pop(record) + f"{name},sha256={digest},{len(data)}\n".encode()
    tmp = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
        for n, content in [*entries.items(), (name, data), (record, record_text)]:  # RECORD stays last
            zf.writestr(n, content)
    tmp.replace(wheel)


setup(cmdclass={"build_py": build_py_with_pth, "editable_wheel": editable_wheel_with_pth})
