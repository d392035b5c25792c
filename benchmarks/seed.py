"""The seed study's reported peak memory (read off its charts, about +-5%; PyTorch, fp16 mixed precision, Adafactor,
character-level tiny Shakespeare, length 4096, batch 1). The charts say "MB"; they are compared with MiB here.

Source: experiments 1-3 of a published reproducibility study of the Reformer (Transformer LM, LSH LM,
Reversible LM, Reformer LM).
"""

# Experiment 1: the four variants at 6 layers, 8 hash rounds.
VARIANTS_MB = {"transformer": 8550, "lsh": 5100, "reversible": 2100, "reformer": 1330}
# Experiment 2: Reformer against hash rounds.
HASHES_MB = {2: 540, 4: 800, 8: 1320, 16: 2350}
# Experiment 3: Reformer from 2 to 12 layers (end points), Transformer at 4 and 8 layers.
LAYERS_MB = {"reformer": {2: 1225, 12: 1460}, "transformer": {4: 5700, 8: 11400}}
# Paper Table 5: exponent of length in activation memory.
TABLE5_EXPONENT = {"full": 2, "lsh": 1}

LABELS = {"transformer": "Transformer LM", "lsh": "LSH LM", "reversible": "Reversible LM", "reformer": "Reformer LM"}
