"""FaceMAE on Ray."""
