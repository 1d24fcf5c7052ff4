"""Operations: what the CLI and the web app do by driving Temporal (enrolling, control, demo).

Above the activities and workflows in the layer order (see the import contract in
pyproject.toml): an operation may start or signal workflows; nothing below imports it.
"""
