"""Scripts that choose or check a training recipe (run from the repository root as
`python -m research.NAME`); see docs/training.md."""
