"""Execute the book's chapters as plain Python, without Jupyter: for a machine that has torch but no notebook
stack (the GPU machine this project borrows has no jupyter-book, nbclient or jupytext, and no network).

Each chapter's ```{code-cell}``` blocks run in order in one namespace, with ``book/`` as the working directory,
as the book build runs them. Cells tagged ``skip-execution`` are skipped, as MyST-NB skips them; ``raises-exception``
cells may raise; a ``%%writefile`` cell writes its file, as IPython's magic does. ``myst_nb.glue`` and
``IPython.display`` are stood in for when they are missing: glued values are collected into ``glue.json``; figures
are saved as PNGs instead of shown. An assertion that fails in a cell fails the chapter, as in the book build.
A SIGTERM (gpu.sh's time limit) stops the run where it is: that chapter is recorded as stopped in its cell, and
the chapters after it are not started.

    python benchmarks/run_chapters.py --out /tmp/chapters            # every chapter of _toc.yml
    python benchmarks/run_chapters.py --out /tmp/ch book/routing.md  # some

Writes OUT/<chapter>/{log.txt, glue.json, fig-*.png} and OUT/summary.json; exits 1 when any chapter failed or was
stopped. Each log is written as its chapter runs and the summary after every chapter, so a run killed on the way
keeps what it did.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import sys
import time
import traceback
import types
from pathlib import Path

from switch_core.checkpoint import replace_text  # the chapters import switch_core too

REPO = Path(__file__).resolve().parents[1]
CELL = re.compile(r"^```\{code-cell\}[^\n]*\n(.*?)^```\s*$", re.S | re.M)


def toc_chapters() -> list[Path]:
    """Notebook chapters listed in _toc.yml (root first), read without a YAML library."""
    names = re.findall(r"^\s*(?:root|- file):\s*(\S+)", (REPO / "_toc.yml").read_text(), re.M)
    paths = [REPO / f"{n.removesuffix('.md')}.md" for n in names]
    return [p for p in paths if p.is_file() and "format_name: myst" in p.read_text().split("---")[1]]


def cells(path: Path) -> list[tuple[str, set[str]]]:
    """(source, tags) of every code cell; MyST option lines (``:tags: [...]``, ``:mystnb:``) are stripped."""
    out = []
    for body in CELL.findall(path.read_text(encoding="utf-8")):
        lines = body.splitlines()
        tags: set[str] = set()
        i = 0
        while i < len(lines) and lines[i].startswith(":"):
            m = re.match(r":tags:\s*\[(.*)\]", lines[i])
            if m:
                tags |= {t.strip().strip("'\"") for t in m.group(1).split(",") if t.strip()}
            i += 1
        out.append(("\n".join(lines[i:]), tags))
    return out


_STATE = {"glued": {}, "fig_dir": None, "n_fig": 0, "installed": False}


def install_shims() -> None:
    """Once per process: figures go to PNG files; glue records every value (and calls MyST-NB's glue when that
    is installed); IPython.display is stood in for when missing."""
    if _STATE["installed"]:
        return
    _STATE["installed"] = True
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def show(*_, **__):
        for num in plt.get_fignums():
            _STATE["n_fig"] += 1
            plt.figure(num).savefig(_STATE["fig_dir"] / f"fig-{_STATE['n_fig']:02d}.png", dpi=80)
        plt.close("all")

    plt.show = show
    try:
        import myst_nb
        real_glue = myst_nb.glue
    except ImportError:
        myst_nb, real_glue = types.ModuleType("myst_nb"), None
        sys.modules["myst_nb"] = myst_nb

    def glue(name, value, display=True):
        _STATE["glued"][name] = value if isinstance(value, (int, float, str, bool)) else repr(value)
        return real_glue(name, value, display=display) if real_glue is not None else None

    myst_nb.glue = glue
    try:
        import IPython.display  # noqa: F401
    except ImportError:
        display_mod = types.ModuleType("IPython.display")
        display_mod.Markdown = lambda text: text
        display_mod.display = lambda *objs, **_: [print(o) for o in objs]
        ipython = types.ModuleType("IPython")
        ipython.display = display_mod
        sys.modules["IPython"], sys.modules["IPython.display"] = ipython, display_mod


def write_file_magic(source: str, namespace: dict) -> None:
    """IPython's ``%%writefile [-a] PATH`` cell magic: the rest of the cell goes to PATH, in which ``{expr}`` is
    replaced by its value in the chapter's namespace (IPython's expansion of magic lines)."""
    line, _, body = source.partition("\n")
    args = re.sub(r"\{([^{}]+)\}", lambda m: str(eval(m.group(1), namespace)), line).split()[1:]
    append = args[:1] == ["-a"]
    target = Path(" ".join(args[1:] if append else args))
    print(f"{'Appending to' if append else 'Writing'} {target}")
    with open(target, "a" if append else "w", encoding="utf-8") as f:
        f.write(body if body.endswith("\n") else body + "\n")


class Stopped(BaseException):
    """Raised by the SIGTERM handler: not an Exception, so no cell's own ``except Exception`` swallows it."""


def _stop(signum, _frame):
    raise Stopped(f"signal {signum}")


def run_chapter(path: Path, out_root: Path) -> dict:
    out_dir = out_root / path.stem
    out_dir.mkdir(parents=True, exist_ok=True)
    install_shims()
    _STATE.update(glued={}, fig_dir=out_dir, n_fig=0)
    from IPython.display import display  # real or stand-in

    namespace = {"__name__": "__main__", "display": display}
    log = open(out_dir / "log.txt", "w", encoding="utf-8", buffering=1)  # line by line: a kill keeps it
    status, t0, n_run = "passed", time.perf_counter(), 0
    cwd = os.getcwd()
    os.chdir(REPO / "book")
    try:
        for i, (source, tags) in enumerate(cells(path)):
            if "skip-execution" in tags:
                continue
            n_run += 1
            try:
                with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                    if source.startswith("%%writefile"):
                        write_file_magic(source, namespace)
                    else:
                        exec(compile(source, f"{path.name}:cell{i}", "exec"), namespace)
            except Exception:  # noqa: BLE001 - any error fails the chapter, as in the book build
                if "raises-exception" in tags:
                    continue
                log.write(f"\n--- cell {i} failed ---\n{traceback.format_exc()}")
                status = f"failed in cell {i}"
                break
            except Stopped:
                log.write(f"\n--- stopped in cell {i} (SIGTERM: the time limit) ---\n{traceback.format_exc()}")
                status = f"stopped in cell {i}"
                break
    finally:
        os.chdir(cwd)
        log.close()
        import matplotlib.pyplot as plt
        plt.close("all")
    (out_dir / "glue.json").write_text(json.dumps(_STATE["glued"], indent=2, default=repr) + "\n")
    return {"chapter": path.stem, "status": status, "cells_run": n_run, "wall_s": round(time.perf_counter() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("chapters", nargs="*", help="chapter .md files (default: every notebook chapter of _toc.yml)")
    ap.add_argument("--out", required=True, help="output folder")
    args = ap.parse_args(argv)
    paths = [Path(p).resolve() for p in args.chapters] or toc_chapters()
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        ap.error(f"no such chapter: {', '.join(missing)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    signal.signal(signal.SIGTERM, _stop)
    for p in paths:
        try:
            r = run_chapter(p, out)
        except Stopped:  # between cells: the chapter is recorded as stopped where it was
            r = {"chapter": p.stem, "status": "stopped", "cells_run": None, "wall_s": None}
        results.append(r)
        print(f"{r['chapter']:20s} {r['status']:22s} {r['cells_run'] or 0:3d} cells {r['wall_s'] or 0:7.1f} s",
              flush=True)
        replace_text(out / "summary.json", json.dumps(results, indent=2) + "\n")  # after every chapter, atomically
        if r["status"].startswith("stopped"):
            print("stopped (SIGTERM): the chapters after it were not run", flush=True)
            break
    return 0 if len(results) == len(paths) and all(r["status"] == "passed" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
