"""Optimizers beyond a single torch class: GaLore/APOLLO (lowrank), BAdam (badam), several joined as one (joint)."""
