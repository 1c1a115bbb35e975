"""mkdocs hooks: the API page must document every public name of jepa_ema."""

from __future__ import annotations

import re
from typing import Any

from mkdocs.exceptions import PluginError


def on_page_markdown(markdown: str, page: Any, **_: Any) -> str:
  if page.file.src_uri != "api.md":
    return markdown
  import jepa_ema

  documented = set(re.findall(r"^::: jepa_ema\.(\w+)", markdown, flags=re.M))
  missing = sorted(set(jepa_ema.__all__) - documented)
  unknown = sorted(documented - set(jepa_ema.__all__))
  if missing or unknown:
    raise PluginError(
      f"docs/api.md: public names missing from the API reference: {missing}; "
      f"entries that are not public names: {unknown}"
    )
  return markdown
