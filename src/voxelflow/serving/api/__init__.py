"""The inference service's HTTP layer: its dependencies (keys, admission, limits), its routers (prediction, the
model, health and metrics), its metrics and the request log; ``voxelflow.serving.serve.create_app`` wires them."""
