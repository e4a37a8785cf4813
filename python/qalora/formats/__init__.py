"""Other projects' model file formats, read and written beside qalora's own checkpoints.

* :mod:`.gguf` / :mod:`.gguf_export`: llama.cpp's GGUF, in (:func:`qalora.load_gguf`) and out
  (:func:`qalora.export_gguf`); :mod:`.gguf_blocks` holds the block codecs, :mod:`.gguf_file`
  the header and row reader, :mod:`.gguf_arch` the architectures and tensor names,
  :mod:`.gguf_vocab` the tokenizer metadata. See docs/gguf.md.
* :mod:`.gptq_checkpoint`: Hugging Face GPTQ checkpoints (``qweight`` / ``qzeros`` / ``scales``), in
  and out (:mod:`.gptq`, its former name, is the same module). The GPTQ *quantizer* is
  :mod:`qalora.gptq_quantizer`.
* :mod:`.llama_cpp_eval`: perplexity of a GGUF file as llama.cpp computes it (llama-cpp-python).
"""
