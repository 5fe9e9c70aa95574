"""Repository and launch buttons only when the book's repository is known, so no page links to an
address that does not exist.

The repository URL is one setting, read at build time:

1. the environment variable ``BOOK_REPOSITORY_URL`` when it is set (set but empty: no repository);
2. else ``git remote get-url origin`` of the book's checkout, when that is a GitHub URL
   (https or ssh).

Either way it is normalised to ``https://github.com/<owner>/<repo>`` (no ``.git``, no credentials).
Only GitHub is accepted: the launch link is built as a mybinder.org ``gh`` link. A private GitHub repository cannot
be told apart from here; build it with ``BOOK_REPOSITORY_URL=`` to show no buttons.

With a URL, sphinx-book-theme gets ``repository_url``, ``use_repository_button`` and the launch
services of ``repository_launch_buttons`` (``_config.yml``: Binder; ``binder/`` sets up its environment), which it turns into
links to ``<service>/.../<owner>/<repo>/<branch>/<page source>``. Without one, the repository button
and every launch service are switched off (the theme adds no launch menu when no service is set).
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from sphinx.application import Sphinx
from sphinx.config import Config
from sphinx.errors import ConfigError
from sphinx.util import logging

logger = logging.getLogger(__name__)

ENV_VAR = "BOOK_REPOSITORY_URL"
LAUNCH_SERVICES = ("binderhub_url", "jupyterhub_url", "colab_url", "deepnote_url", "jupyterlite_url")

_OWNER = r"(?P<owner>[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)"
_REPO = r"(?P<repo>[A-Za-z0-9._-]+?)"
_GITHUB = [
    # https://github.com/o/r(.git), with or without user[:token]@ (never kept), http, git://
    re.compile(rf"^(?:https?|git)://(?:[^@/]+@)?github\.com/{_OWNER}/{_REPO}(?:\.git)?/?$"),
    # ssh://git@github.com(:22)/o/r(.git)
    re.compile(rf"^ssh://(?:[^@/]+@)?github\.com(?::\d+)?/{_OWNER}/{_REPO}(?:\.git)?/?$"),
    # git@github.com:o/r(.git)  (scp-like ssh)
    re.compile(rf"^(?:[^@/]+@)?github\.com:{_OWNER}/{_REPO}(?:\.git)?/?$"),
]


def github_https_url(url: str) -> str | None:
    """``https://github.com/<owner>/<repo>`` for a GitHub https/ssh URL of a repository, else None."""
    url = url.strip()
    for pattern in _GITHUB:
        match = pattern.match(url)
        if match and match["repo"] not in (".", ".."):
            return f"https://github.com/{match['owner']}/{match['repo']}"
    return None


def git_origin_url(checkout: Path) -> str | None:
    """``git remote get-url origin`` in ``checkout``; None when there is no git, repository or origin."""
    try:
        proc = subprocess.run(["git", "remote", "get-url", "origin"], cwd=checkout,
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return None
    return proc.stdout.strip() or None


def repository_url(checkout: Path, environ: dict[str, str] = os.environ) -> str | None:
    """The book's public repository URL (see the module docstring), or None when there is none.

    Raises ConfigError when BOOK_REPOSITORY_URL is set to something that is not a GitHub repository."""
    if ENV_VAR in environ:
        value = environ[ENV_VAR].strip()
        if not value:
            return None
        url = github_https_url(value)
        if url is None:
            raise ConfigError(f"{ENV_VAR}={value!r} is not a GitHub repository URL "
                              "(https://github.com/<owner>/<repo>); set it empty for no repository button")
        return url
    origin = git_origin_url(checkout)
    return github_https_url(origin) if origin else None


def apply_repository(app: Sphinx, config: Config) -> None:
    url = repository_url(Path(app.srcdir))
    options = dict(config.html_theme_options)
    launch = dict(options.get("launch_buttons") or {})
    if url is None:
        options.pop("repository_url", None)
        for key in ("use_repository_button", "use_issues_button", "use_edit_page_button", "use_source_button"):
            options[key] = False
        for key in LAUNCH_SERVICES:
            launch[key] = ""
        logger.info("repository links: none (no %s and no GitHub remote 'origin')", ENV_VAR)
    else:
        options["repository_url"] = url
        options["use_repository_button"] = True
        launch.update(config.repository_launch_buttons)
        logger.info("repository links: %s, launch buttons: %s", url,
                    ", ".join(k for k in LAUNCH_SERVICES if launch.get(k)) or "none")
    options["launch_buttons"] = launch
    config.html_theme_options = options


def setup(app: Sphinx) -> dict:
    app.add_config_value("repository_launch_buttons", {}, "html", dict)
    # Before sphinx-book-theme reads the options (its own config-inited handler has priority 500).
    app.connect("config-inited", apply_repository, priority=400)
    return {"version": "0.1", "parallel_read_safe": True, "parallel_write_safe": True}
