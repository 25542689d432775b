"""Start-up hook that lets `platform.train` and the standard `platform` module live together.

Our package is called `platform`, like the standard-library module that torch, ray and mlflow
call (`platform.system()` and friends). A regular package of that name would shadow the
standard module (Ray even puts a job's working directory first on every worker's path), so:

* `platform/` has no `__init__.py`. A folder without one never shadows a module: the import
  system keeps looking and takes the standard `platform.py`.
* This module runs at interpreter start-up (the wheel ships `metaplatform.pth`, which imports
  it, the mechanism setuptools uses for `distutils-precedence.pth`). It imports the standard
  `platform` module and gives it a `__path__`, which turns it into a package whose submodules
  (`platform.train`, ...) are looked up in our folders while `platform.system()` stays intact.
* The `__path__` is recomputed at every submodule import: first every `platform/` folder on
  `sys.path` that holds our code (a Ray working directory, the current directory of
  `python -m`), then the installed copy. So the code a user just edited wins over an older
  installed copy, exactly as a normal package on `sys.path` would.
"""

import os
import sys

import platform

# A `platform/` folder is ours when it holds this file: it tells it apart from unrelated folders.
_MARKER = "train.py"
_INSTALLED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "platform")


class _PlatformPath:
    """A `__path__` that is computed anew each time the import system iterates it."""

    def _folders(self):
        seen = []
        for entry in [*sys.path, os.path.dirname(_INSTALLED)]:
            folder = os.path.join(os.path.abspath(entry or os.getcwd()), "platform")
            if folder not in seen and os.path.isfile(os.path.join(folder, _MARKER)):
                seen.append(folder)
        return seen

    def __iter__(self):
        return iter(self._folders())

    def __len__(self):
        return len(self._folders())

    def __getitem__(self, index):
        return self._folders()[index]

    def __contains__(self, item):
        return item in self._folders()

    def __repr__(self):
        return f"_PlatformPath({self._folders()!r})"


if not hasattr(platform, "__path__"):
    platform.__path__ = _PlatformPath()
