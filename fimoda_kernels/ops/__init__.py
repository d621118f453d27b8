"""The kernels' Python face: one module per op (validate → pick backend → call); each holds its
pure-torch reference ``_<op>_reference``, the test oracle and benchmark baseline."""
