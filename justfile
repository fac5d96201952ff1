# catdog-cache developer recipes (`pip install rust-just` provides `just`).
py := ".venv/bin/python"

# create .venv with the pinned torch pair these machines carry, plus the dev tools
setup:
    python3 -m venv .venv && .venv/bin/pip install -q torch==2.14.1 torchvision==0.29.1 -e ".[dev]"

# the main job on an embedded, drawn sample set (offline)
demo:
    .venv/bin/catdog-cache demo

# the test suite (offline, generated images, seeded random weights)
test:
    .venv/bin/pytest -q

lint:
    .venv/bin/ruff check .

fix:
    .venv/bin/ruff check --fix .

# benchmarks (see README "Performance")
bench *ARGS:
    .venv/bin/catdog-cache bench {{ARGS}}
