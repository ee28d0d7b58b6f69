"""Synthetic slides in the challenge's format: the demo dataset and real-size samples (`python -m synthetic.demo`).

Built on `slidedata` (its sample writer); `slidedata` never imports this package.
"""
