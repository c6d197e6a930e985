"""nanovlm-ray: small vision-language models trained on Ray."""
