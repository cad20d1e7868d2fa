"""wsda_jax: weakly-supervised domain-adaptive semantic segmentation with prototypical
contrastive learning (Das et al., CVPR 2023) in JAX/Flax."""
