"""Activation capture: one forward pass, needs reduced inside hooks, optional interventions."""
