"""The model catalogue: `models.toml`, its validation, the gossip form of entries, feasibility and placement.

- `entry`     — `ModelEntry`, one validated entry (how to serve a model, not where).
- `validate`  — raw tables → entries or `Problem`s naming file, entry and field.
- `durations` — `keep_alive` values (`"1h30m"`, seconds, `0`, `-1`).
- `store`     — `load_catalogue`, `Catalogue.resolve`, tomlkit edits that keep comments
                (`add_entry`, `update_entry`, `remove_entry`), `ensure_catalogue`, `entry_to_dict` /
                `entry_from_dict` for gossip (the mesh-wide merge is
                `helexa.mesh.fleet.merge.newest_entries`).
- `placement` — pure feasibility, eviction and placement over node views (the shapes of
                `helexa.mesh.fleet.records`).

The packaged default catalogue is `catalogue/models.toml`; `builtin:NAME` sources point at
`catalogue/NAME/` in the installed package.
"""

from .durations import format_keep_alive, parse_keep_alive
from .entry import DEFAULT_KEEP_ALIVE_S, EngineChoice, ModelEntry
from .placement import (
    DeviceView,
    ModelView,
    NodeView,
    devices_fitting_now,
    eviction_plan,
    feasible_devices,
    feasible_on,
    infeasible_reason,
    place,
)
from .store import (
    Catalogue,
    CatalogueEditError,
    InvalidEntryError,
    add_entry,
    default_catalogue_text,
    ensure_catalogue,
    entry_from_dict,
    entry_to_dict,
    load_catalogue,
    parse_catalogue_text,
    remove_entry,
    update_entry,
)
from .validate import FIELDS, Problem, builtin_path, parse_entry, validate_catalogue

__all__ = [
    "DEFAULT_KEEP_ALIVE_S",
    "FIELDS",
    "Catalogue",
    "CatalogueEditError",
    "DeviceView",
    "EngineChoice",
    "InvalidEntryError",
    "ModelEntry",
    "ModelView",
    "NodeView",
    "Problem",
    "add_entry",
    "builtin_path",
    "default_catalogue_text",
    "devices_fitting_now",
    "ensure_catalogue",
    "entry_from_dict",
    "entry_to_dict",
    "eviction_plan",
    "feasible_devices",
    "feasible_on",
    "format_keep_alive",
    "infeasible_reason",
    "load_catalogue",
    "parse_catalogue_text",
    "parse_entry",
    "parse_keep_alive",
    "place",
    "remove_entry",
    "update_entry",
    "validate_catalogue",
]
