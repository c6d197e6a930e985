"""Models that leave the platform (docs/export.md).

    checkpoint_files.py   what makes a checkpoint directory self-contained: tokenizer, image
                          processor settings, model card (README.md)
    model_card.py         the model card
    idefics3.py           `nanovlm export --format transformers`: an Idefics3 (SmolVLM) directory
    idefics3_processor.py its tokenizer and processor, and what they cannot reproduce
    hub.py                `nanovlm push`: a checkpoint (or its export) to the Hugging Face Hub
    mlflow_model.py       the final model of a run as an MLflow pyfunc model, and its registration
"""
