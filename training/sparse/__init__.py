"""The sparse autoencoder of the ambiguation mode: training and export."""
