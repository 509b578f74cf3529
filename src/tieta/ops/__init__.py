"""Pure tensor operations of the methods: they import nothing of tieta, so each can be tested on random tensors."""
