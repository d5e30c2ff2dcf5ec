"""Everything that uses a trained model: loading any checkpoint (``loading``), scoring a split
(``evaluate``), labelling image files (``predict``) and drawing what the scenes learned
(``inspect``)."""
