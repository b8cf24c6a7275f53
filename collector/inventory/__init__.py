"""The endpoint inventory: learned path templates (templates.py), per-endpoint facts
(model.py), their store in the collector (store.py), OpenAPI out and a diff against a
given spec (openapi.py), and the `loupe endpoints` / `loupe api` commands (cli.py).
docs/inventory.md has the algorithm and its bounds."""
