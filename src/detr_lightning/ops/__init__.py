"""Small tensor operations shared by the model, the data pipeline and the losses."""
