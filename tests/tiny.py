"""Options shared by the end-to-end tests: timm's tiny random test ViT at 32 px, no workers, no bars."""

TINY_MODEL = ["--model", "lnshift/test-vit", "--model-kwargs", "{img_size: 32, patch_size: 8}"]
TINY = [*TINY_MODEL, "--min-epoch-steps", "1", "--workers", "0", "--progress", "false"]
