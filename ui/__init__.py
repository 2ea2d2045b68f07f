"""The LoRA Studio web UI (Gradio): a thin layer over the `lora_studio` library."""
