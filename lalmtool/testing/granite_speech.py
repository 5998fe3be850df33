"""A tiny randomly initialised Granite Speech checkpoint in the real layout, for mechanics tests and
cost benchmarks (never for accuracy claims).

The real checkpoints (``ibm-granite/granite-speech-3.3-2b`` / ``-8b``) are transformers
``GraniteSpeechForConditionalGeneration``: a Conformer CTC encoder (block attention over 200
frames, Shaw relative positions, self-conditioning from the middle layer) over stacked log-mels
(80 mel bins, 10 ms hop, two frames stacked: 160 features at 50 frames/s), a *windowed* Q-Former
projector (``model.projector``: the encoder frames are cut into windows of ``window_size`` = 15
frames, 0.3 s, zero-padded at the end, and ``window_size // downsample_rate`` = 3 learnt queries
cross-attend to each window, then a linear maps them to the LLM width: 10 audio tokens/s) and a
Granite decoder (plus a LoRA adapter the real repos ship separately; none here). The processor
(``GraniteSpeechProcessor``: ``GraniteSpeechFeatureExtractor`` + tokenizer) expands each
``<|audio|>`` in the text to ``3 * ceil((n_samples // 160 + 1) // 2 / 15)`` placeholders.

The tokenizer here is a small byte-level BPE (the 256 byte symbols and a few merges) in Granite's
GPT-2 style, with Granite 3.3's special tokens at the same places (``<|end_of_text|>`` = 0 is
bos, eos, pad and unk; the role and citation tokens after the vocabulary) and ``<|audio|>`` last,
as in the real tokenizer (id 49159 of 49160 there), and the real chat template.
"""
from __future__ import annotations

import torch

#: The placeholder the processor expands to one token per projected audio frame.
AUDIO_TOKEN = "<|audio|>"

#: Granite 3.3's special tokens: the StarCoder ones at the start of the vocabulary
#: (``<|end_of_text|>`` = 0 is bos, eos, pad and unk), ...
GRANITE_BASE_SPECIAL_TOKENS = [
    "<|end_of_text|>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>", "<filename>",
    "<gh_stars>", "<issue_start>", "<issue_comment>", "<issue_closed>", "<jupyter_start>",
    "<jupyter_text>", "<jupyter_code>", "<jupyter_output>", "<empty_output>", "<commit_before>",
    "<commit_msg>", "<commit_after>", "<reponame>"]
#: ... the chat ones after the BPE vocabulary, and Granite Speech's audio placeholder last.
GRANITE_ADDED_SPECIAL_TOKENS = [
    "<|start_of_role|>", "<|end_of_role|>", "<|tool_call|>", "<|start_of_cite|>", "<|end_of_cite|>",
    "<|start_of_plugin|>", "<|end_of_plugin|>", AUDIO_TOKEN]

#: The chat template of granite-speech-3.3 (that of granite-3.3-instruct, whose tokenizer it
#: extends). Rendering the model card's chat (a system turn, then
#: ``"<|audio|>can you transcribe the speech into a written format?"``) with
#: ``add_generation_prompt=True`` gives
#: ``<|start_of_role|>system<|end_of_role|>{system}<|end_of_text|>\n<|start_of_role|>user<|end_of_role|>{user}<|end_of_text|>\n<|start_of_role|>assistant<|end_of_role|>``.
GRANITE_SPEECH_CHAT_TEMPLATE = r"""{# Alias tools -> available_tools #}
{%- if tools and not available_tools -%}
    {%- set available_tools = tools -%}
{%- endif -%}
{%- if messages[0]['role'] == 'system' %}
     {%- set system_message = messages[0]['content'] %}
     {%- set loop_messages = messages[1:] %}
 {%- else %}
     {%- set system_message = "Knowledge Cutoff Date: April 2024.\nToday's Date: " + strftime_now('%B %d, %Y') + ".\nYou are Granite, developed by IBM." %}
     {%- if available_tools and documents %}
         {%- set system_message = system_message + " You are a helpful assistant with access to the following tools. When a tool is required to answer the user's query, respond only with <|tool_call|> followed by a JSON list of tools used. If a tool does not exist in the provided list of tools, notify the user that you do not have the ability to fulfill the request.\nWrite the response to the user's input by strictly aligning with the facts in the provided documents. If the information needed to answer the question is not available in the documents, inform the user that the question cannot be answered based on the available data." %}
     {%- elif available_tools %}
         {%- set system_message = system_message + " You are a helpful assistant with access to the following tools. When a tool is required to answer the user's query, respond only with <|tool_call|> followed by a JSON list of tools used. If a tool does not exist in the provided list of tools, notify the user that you do not have the ability to fulfill the request." %}
     {%- elif documents %}
         {%- set system_message = system_message + " Write the response to the user's input by strictly aligning with the facts in the provided documents. If the information needed to answer the question is not available in the documents, inform the user that the question cannot be answered based on the available data." %}
    {%- elif thinking %}
    {%- set system_message = system_message + " You are a helpful AI assistant.\nRespond to every user query in a comprehensive and detailed way. You can write down your thoughts and reasoning process before responding. In the thought process, engage in a comprehensive cycle of analysis, summarization, exploration, reassessment, reflection, backtracing, and iteration to develop well-considered thinking process. In the response section, based on various attempts, explorations, and reflections from the thoughts section, systematically present the final solution that you deem correct. The response should summarize the thought process. Write your thoughts between <think></think> and write your response between <response></response> for each user query." %}
     {%- else %}
         {%- set system_message = system_message + " You are a helpful AI assistant." %}
     {%- endif %}
     {%- if 'citations' in controls and documents %}
         {%- set system_message = system_message + '\nUse the symbols <|start_of_cite|> and <|end_of_cite|> to indicate when a fact comes from a document in the search result, e.g <|start_of_cite|> {document_id: 1}my fact <|end_of_cite|> for a fact from document 1. Afterwards, list all the citations with their corresponding documents in an ordered list.' %}
     {%- endif %}
     {%- if 'hallucinations' in controls and documents %}
         {%- set system_message = system_message + '\nFinally, after the response is written, include a numbered list of sentences from the response with a corresponding risk value that are hallucinated and not based in the documents.' %}
     {%- endif %}
     {%- set loop_messages = messages %}
 {%- endif %}
 {{- '<|start_of_role|>system<|end_of_role|>' + system_message + '<|end_of_text|>\n' }}
 {%- if available_tools %}
     {{- '<|start_of_role|>available_tools<|end_of_role|>' }}
     {{- available_tools | tojson(indent=4) }}
     {{- '<|end_of_text|>\n' }}
 {%- endif %}
 {%- if documents %}
     {%- for document in documents %}
         {{- '<|start_of_role|>document {"document_id": "' + document['doc_id'] | string + '"}<|end_of_role|>\n' }}
         {{- document['text'] }}
         {{- '<|end_of_text|>\n' }}
              {%- endfor %}
 {%- endif %}
 {%- for message in loop_messages %}
     {{- '<|start_of_role|>' + message['role'] + '<|end_of_role|>' + message['content'] + '<|end_of_text|>\n' }}
     {%- if loop.last and add_generation_prompt %}
         {{- '<|start_of_role|>assistant' }}
             {%- if controls %}
                 {{- ' ' + controls | tojson()}}
             {%- endif %}
         {{- '<|end_of_role|>' }}
     {%- endif %}
 {%- endfor %}"""


def _tokenizer():
    """Granite-style byte-level BPE with Granite 3.3's special tokens and chat template."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    from transformers.models.gpt2.tokenization_gpt2 import GPT2Tokenizer

    vocab = {tok: i for i, tok in enumerate(GRANITE_BASE_SPECIAL_TOKENS)}
    for ch in bytes_to_unicode().values():
        vocab[ch] = len(vocab)
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("e", "n"), ("i", "n")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    eot = GRANITE_BASE_SPECIAL_TOKENS[0]
    tok = GPT2Tokenizer(vocab=vocab, merges=merges, bos_token=eot, eos_token=eot, pad_token=eot,
                        unk_token=eot, padding_side="left",
                        additional_special_tokens=GRANITE_BASE_SPECIAL_TOKENS[1:]
                        + GRANITE_ADDED_SPECIAL_TOKENS)
    tok.chat_template = GRANITE_SPEECH_CHAT_TEMPLATE
    return tok


def write_random(path: str, seed: int = 0) -> str:
    """Writes a randomly initialised Granite Speech checkpoint (model, tokenizer, processor) to
    ``path`` and returns ``path``: for mechanics tests and cost benchmarks, never for accuracy.

    Sizes: a 2-layer Conformer of width 32 (self-conditioning after layer 1, as the real 16-layer
    one does after layer 8), a 1-layer Q-Former of width 32 with the real windowing (15 frames ->
    3 queries) and a 2-layer Granite decoder of width 64 with 4096 positions; about 1 MB. The
    feature extractor is the real one (defaults = the real ``preprocessor_config.json``).
    ``has_lora_adapter`` is off (no adapter is written). Some weights are drawn with variance
    1/fan-in instead of std 0.02 so that the output depends on the audio: the Q-Former's
    cross-attention value and output projections and the projector's output linear (else the
    audio tokens are nearly the learnt queries, whatever the audio), and the decoder's attention
    value and output projections (else the ~10 % audio positions barely move the last token's
    logits). Same ``seed``, same weights.
    """
    from transformers import (GraniteSpeechConfig, GraniteSpeechFeatureExtractor,
                              GraniteSpeechForConditionalGeneration, GraniteSpeechProcessor)

    tok = _tokenizer()
    GraniteSpeechProcessor(audio_processor=GraniteSpeechFeatureExtractor(),
                           tokenizer=tok).save_pretrained(path)
    eot = tok.convert_tokens_to_ids(GRANITE_BASE_SPECIAL_TOKENS[0])
    hidden, heads = 64, 4
    cfg = GraniteSpeechConfig(
        encoder_config=dict(input_dim=160, num_layers=2, hidden_dim=32, num_heads=2,
                            feedforward_mult=4, output_dim=42, context_size=200, max_pos_emb=512,
                            conv_kernel_size=15, conv_expansion_factor=2),
        projector_config=dict(model_type="blip_2_qformer", hidden_size=32, num_hidden_layers=1,
                              num_attention_heads=2, intermediate_size=64,
                              encoder_hidden_size=32, cross_attention_frequency=1,
                              max_position_embeddings=2048),
        text_config=dict(model_type="granite", vocab_size=len(tok), hidden_size=hidden,
                         intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=heads, num_key_value_heads=2,
                         max_position_embeddings=4096, rope_theta=1e7, rms_norm_eps=1e-5,
                         embedding_multiplier=12.0, residual_multiplier=0.22,
                         attention_multiplier=heads / hidden, logits_scaling=8.0,
                         tie_word_embeddings=False, bos_token_id=eot, eos_token_id=eot,
                         pad_token_id=eot),
        audio_token_index=tok.convert_tokens_to_ids(AUDIO_TOKEN), downsample_rate=5,
        window_size=15, has_lora_adapter=False, tie_word_embeddings=False)  # untied: a random
    # decoder with tied embeddings repeats the last prompt token whatever the audio
    torch.manual_seed(seed)
    model = GraniteSpeechForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        projector = model.model.projector
        lins = [projector.linear]
        for layer in projector.qformer.encoder.layer:
            lins += [layer.crossattention.attention.value, layer.crossattention.output.dense]
        for layer in model.model.language_model.layers:
            lins += [layer.self_attn.v_proj, layer.self_attn.o_proj]
        for lin in lins:
            lin.weight.normal_(0, lin.in_features ** -0.5)
    model.generation_config.bos_token_id = eot
    model.generation_config.eos_token_id = model.generation_config.pad_token_id = eot
    model.save_pretrained(path)
    return path
