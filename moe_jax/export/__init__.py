"""Checkpoint conversion to and from DeepSeek's Hugging Face layout (docs/export.md).

- `layout`: THE table between our parameter paths and HF tensor names (+ transposes/splits).
- `hf_config`: config.json <-> gin bindings.
- `hf`: `export_hf` (streaming, orbax -> safetensors shards) and `import_hf` (safetensors -> orbax).
- `numpy_reference`: an independent NumPy forward of the HF layout (the logits-parity oracle).
- `orbax_reader`, `safetensors_io`: block-wise reading of orbax arrays, streaming safetensors files.
"""
