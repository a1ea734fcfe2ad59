"""The CLIBD family: image + DNA barcode + taxonomy text contrastive pretraining (see family.py)."""

from lucatrain.families.clibd.family import ClibdFamily, embed, load_clibd  # noqa: F401  (registers the family)
from lucatrain.families.clibd.finetune import ClibdFinetuneFamily, load_classifier  # noqa: F401
