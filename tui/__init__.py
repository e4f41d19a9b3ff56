"""The Textual dashboard (`helexa tui`): the live fleet in a terminal.

Data flows one way: a source feeds states and events, the app diffs them into the visible table.
Imports point down this list (nothing here imports `app`); this file imports nothing, so importing a
submodule never drags in Textual.

- `app`         — `HelexaApp` (tabs, event log, status bar, key bindings, operator requests) and `main`,
                  the `helexa tui` entry point.
- `app.tcss`    — the layout and colours.
- `commands`    — the command palette provider (`FleetCommands`), which sees the app only through the
                  `FleetActions` protocol.
- `messages`    — the Textual messages a source's callbacks become (`StateUpdated`, ...).
- `source`      — where data comes from and actions go: the `FleetSource` / `FleetSink` protocols,
                  `HttpFleetSource` (a real agent, through `helexa.mesh.client`) and `FakeFleetSource`
                  (a seeded simulated fleet held as agent records, shown through the agent's own
                  `state_to_json`).
- `fake_agent`  — `fake_agent_app`: a `FakeFleetSource` behind the agent's `/mesh/state` and
                  `/mesh/events`, for the bench and demos.
- `fleet`       — what the dashboard shows, parsed forgivingly from `/mesh/state` and `/mesh/events` JSON
                  (`FleetState`, `NodeView`, `DeviceView`, `ModelView`, `CatalogueEntryView`,
                  `FleetEvent`, `ConnectionStatus`).
- `traffic`     — `TrafficHistory`: rates and sparklines derived from successive states (pure).
- `rows`        — fleet state → keyed table rows and their columns (pure).
- `screens/`    — modal screens: `ConfirmScreen`, `LoadScreen`, `PinScreen`.
- `widgets/`    — one widget per module: `DiffTable` (writes only changed cells) and the topology,
                  catalogue and traffic tables built on it; `EventLog`; `StatusBar`.
"""
