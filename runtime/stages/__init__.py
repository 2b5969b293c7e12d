"""The tensor contract (contract.py) and the pure processing of each stage: no Triton, no engine; imported by every
layer above (docs/development.md, "Layout")."""
