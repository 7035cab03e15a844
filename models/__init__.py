"""The model zoo: one small module per model family (build, example inputs, export).

Exported artifacts go to the git-ignored ``artifacts/`` folder; nothing is downloaded.
"""
