"""Importers of other data into the challenge's format: spot-level spatial transcriptomics
(`python -m importers.spots`).

Built on `slidedata` (its sample writer); `slidedata` never imports this package.
"""
