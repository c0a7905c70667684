"""Lets transformers load vaclm folders in processes that never `import vaclm`.

vaclm installs `vaclm-hook.pth` next to this module in site-packages; Python runs its one line
(`import _vaclm_hook`) at start-up. All that costs is this small module and one entry on
sys.meta_path: nothing of vaclm, torch or transformers is imported. Only when a process imports
`transformers.quantizers.auto` (as `from_pretrained`, lm-eval and vLLM do) does the entry act: once
that module has run, vaclm's quantizer is registered with it, exactly as `import vaclm` would.

If the registration fails (a broken vaclm install), a warning says so; loading a vaclm folder then
fails with transformers' own error naming vaclm, never with randomly initialised layers.
"""

import sys

TARGET = "transformers.quantizers.auto"


class _Finder:
    """A meta path finder that only ever answers for TARGET, by wrapping the real loader."""

    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if fullname != TARGET:
            return None
        for finder in sys.meta_path:
            if finder is cls or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and not isinstance(spec.loader, _Loader):
            spec.loader = _Loader(spec.loader)
        return spec


class _Loader:
    """Runs the real loader, then registers vaclm's quantizer with the module it just ran."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        register()

    def __getattr__(self, name):  # get_source, get_filename, is_package, ...
        return getattr(self.loader, name)


def register() -> None:
    try:
        quantizer = sys.modules.get("vaclm.io.hf_quantizer")
        if quantizer is None:
            import vaclm.io.hf_quantizer  # noqa: F401  (registers at import)
        elif hasattr(quantizer, "register"):  # imported before: again, for a reloaded transformers module
            quantizer.register()
        # else it is being imported right now (it imports transformers' quantizers) and registers at its end
    except Exception as exc:  # never break a process that merely uses transformers
        import warnings

        warnings.warn(f"vaclm is installed but could not register its transformers quantizer "
                      f"({type(exc).__name__}: {exc}); vaclm folders will not load until it is reinstalled",
                      RuntimeWarning, stacklevel=2)


def install() -> None:
    """Idempotent; if transformers' quantizers are already imported, register at once."""
    if _Finder not in sys.meta_path:
        sys.meta_path.insert(0, _Finder)
    if TARGET in sys.modules:
        register()


def uninstall() -> None:
    while _Finder in sys.meta_path:
        sys.meta_path.remove(_Finder)


install()
