"""qks.serving: serving the torch-free runtime -- `qks-serve` (the HTTP service), the model inside Triton's
Python backend (`triton_model`) and the tritonserver launcher (`triton_server`). Imports go one way:
serving -> runtime -> engines; nothing here imports torch."""
