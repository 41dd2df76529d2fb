"""Model building: datasets, networks, adversarial training, export and audits (torch)."""
