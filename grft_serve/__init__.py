"""grft-serve: serve many GRFT fine-tuned tasks from one frozen backbone.

Core pieces: :mod:`grft_serve.core.rowop` (the row op shared with training), :mod:`grft_serve.core.package`
(task packages), :mod:`grft_serve.engine` (the serving engine), :mod:`grft_serve.app` (Ray Serve).
"""
__version__ = "0.1.0"
