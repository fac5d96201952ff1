"""Engines are distributors: each runs extract's per-unit work over the units of a source; dispatch.extract picks
one by name, as img2dataset's distributor.py does. local: this process, or torchrun's ranks sharing the units
(torchrun.py); ray: one task per unit on an actor pool (ray_pool.py, ray_folder.py, ray_tars.py). Every engine plans
with extract.plan, writes cache shards with extract's writer and finishes the index with extract.finish, so a cache
does not record which engine made it. Nothing is imported here: importing torchrun.py stays light."""
