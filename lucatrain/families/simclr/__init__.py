"""The SimCLR family: self-supervised image pretraining (NT-Xent), photographs and multispectral stacks (see family.py)."""

from lucatrain.families.simclr.family import SimclrFamily, embed, load_backbone  # noqa: F401  (registers the family)
