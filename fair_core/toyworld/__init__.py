"""A synthetic world with known bias, its tiny text-to-image model and attribute classifiers (DESIGN §5).

* :mod:`.world`: the image generator, occupations and their skews, content estimates;
* :mod:`.models`: tokenizer, text encoder, pixel-space UNet, classifier, sampler;
* :mod:`.checkpoint`: weight files and :func:`load_toy_world` (the shipped pretrained world);
* :mod:`.pretrain`: reproduces the shipped weights (``python -m fair_core.toyworld.pretrain --out DIR``);
* :mod:`.depth_sweep`: shallow vs deep denoisers on the same biased data (Hakemi et al. 2025).
"""

from fair_core.toyworld.checkpoint import ToyWorld, load_toy_world
from fair_core.toyworld.models import (
    ToyClassifier,
    build_text_encoder,
    build_unet,
    encode_prompts,
    generate,
    learn_vocabulary,
    make_tokenizer,
    prompt_words,
    sampling_scheduler,
    training_scheduler,
)
from fair_core.toyworld.world import (
    HELDOUT_OCCUPATIONS,
    IMAGE_SIZE,
    OCCUPATION_SKEWS,
    OCCUPATIONS,
    PARAM_NAMES,
    TOY_SCHEMA,
    TRAIN_OCCUPATIONS,
    WorldSample,
    content_change,
    draw_figures,
    estimate_content,
    occupation_distribution,
    prompt,
    sample_world,
)

__all__ = [
    "HELDOUT_OCCUPATIONS", "IMAGE_SIZE", "OCCUPATION_SKEWS", "OCCUPATIONS", "PARAM_NAMES", "TOY_SCHEMA",
    "TRAIN_OCCUPATIONS", "ToyClassifier", "ToyWorld", "WorldSample", "build_text_encoder", "build_unet",
    "content_change", "draw_figures", "encode_prompts", "estimate_content", "generate", "learn_vocabulary",
    "load_toy_world", "make_tokenizer", "occupation_distribution", "prompt", "prompt_words", "sample_world",
    "sampling_scheduler", "training_scheduler",
]
