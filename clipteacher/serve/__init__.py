"""Serving beyond one process: a Ray Serve deployment (`ray_serve`), Ray Data batch prediction (`ray_data`)
and the JSON API they share (`api`). Torch-free, like the runtime; Ray is an optional extra
(`pip install -e .[ray]`) and is imported only by the two Ray modules."""
