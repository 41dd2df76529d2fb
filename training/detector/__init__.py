"""The face detector of the client (MTCNN P/R/O-Net): network definitions, the trained
weights that ship inside the facenet-pytorch wheel, and its export to ONNX."""
