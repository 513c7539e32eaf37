"""ChatTemplate renders exactly what transformers' apply_chat_template renders."""
import jinja2
import pytest
from tokenizers import Tokenizer as RawTokenizer
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from wattserve.engine.chat_template import ChatTemplate
from wattserve.engine.request import InvalidRequestError

# Llama 3.1-style: bos_token, header tokens, a dated system header, strict role order.
LLAMA3_TEMPLATE = """{{- bos_token }}
{%- set date_string = strftime_now("%d %b %Y") %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{%- if tools is not none %}
    {{- "You have access to these functions:\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message + "<|eot_id|>" }}
{%- for message in messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

# Qwen2.5's template (tools in <tools> tags, tool calls and tool responses), unchanged in logic.
QWEN2_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city, <b>in °C</b> & wind",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "e.g. Zürich"}},
            "required": ["city"],
        },
    },
}

TOOL_CONVERSATION = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "Weather in Zürich?"},
    {"role": "assistant", "content": "",
     "tool_calls": [{"type": "function",
                     "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}]},
    {"role": "tool", "content": '{"temp": 21, "wind": "<5 km/h"}'},
    {"role": "user", "content": "And tomorrow?"},
]


@pytest.fixture(scope="module")
def hf_tokenizer():
    """A tiny transformers tokenizer: apply_chat_template only needs its bos/eos strings."""
    vocab = {"<unk>": 0, "<|begin_of_text|>": 1, "<|eot_id|>": 2}
    return PreTrainedTokenizerFast(
        tokenizer_object=RawTokenizer(WordLevel(vocab, unk_token="<unk>")),
        bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", unk_token="<unk>",
    )


def render_both(hf_tokenizer, template, messages, tools=None, add_generation_prompt=True):
    expected = hf_tokenizer.apply_chat_template(
        messages, tools=tools, chat_template=template, tokenize=False,
        add_generation_prompt=add_generation_prompt,
    )
    got = ChatTemplate(template).render(
        messages, tools=tools, add_generation_prompt=add_generation_prompt,
        bos_token=hf_tokenizer.bos_token, eos_token=hf_tokenizer.eos_token,
    )
    return got, expected


@pytest.mark.parametrize("tools", [None, [WEATHER_TOOL]], ids=["no-tools", "tools"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_llama3_template_matches_transformers(hf_tokenizer, tools, add_generation_prompt):
    messages = [{"role": "system", "content": "  Be terse.  "},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "Weather in Zürich?"}]
    got, expected = render_both(hf_tokenizer, LLAMA3_TEMPLATE, messages, tools,
                                add_generation_prompt)
    assert got == expected, \
        f"Llama 3 template differs from transformers:\n{got!r}\n!=\n{expected!r}"


@pytest.mark.parametrize("tools", [None, [WEATHER_TOOL]], ids=["no-tools", "tools"])
def test_qwen2_template_with_tools_and_system_matches_transformers(hf_tokenizer, tools):
    got, expected = render_both(hf_tokenizer, QWEN2_TEMPLATE, TOOL_CONVERSATION, tools)
    assert got == expected, f"Qwen2 template differs from transformers:\n{got!r}\n!=\n{expected!r}"


def test_tojson_keeps_html_and_non_ascii_characters(hf_tokenizer):
    got, _ = render_both(hf_tokenizer, QWEN2_TEMPLATE, TOOL_CONVERSATION, [WEATHER_TOOL])
    assert "<b>in °C</b> & wind" in got, "tojson must not HTML-escape or ASCII-escape tool schemas"
    assert '"arguments": {"city": "Zürich"}' in got


def test_raise_exception_becomes_invalid_request(hf_tokenizer):
    messages = [{"role": "assistant", "content": "I speak first"}]
    with pytest.raises(InvalidRequestError) as info:
        ChatTemplate(LLAMA3_TEMPLATE).render(messages, bos_token="<s>", eos_token="</s>")
    assert info.value.param == "messages"
    assert str(info.value) == "Conversation roles must alternate user/assistant/user/assistant/..."


def test_template_tripping_over_message_shape_is_invalid_request():
    # Qwen2's template concatenates message.content; None there is the request's doing.
    with pytest.raises(InvalidRequestError, match="could not render") as info:
        ChatTemplate(QWEN2_TEMPLATE).render([{"role": "user", "content": None}])
    assert info.value.param == "messages"


def test_sandbox_forbids_mutating_messages():
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(InvalidRequestError):
        ChatTemplate("{{ messages.append({'role': 'x'}) }}").render(messages)
    assert messages == [{"role": "user", "content": "hi"}]


def test_content_parts_pass_through_unchanged():
    template = ("{% for m in messages %}{% for part in m.content %}"
                "[{{ part.type }}:{{ part.text }}]{% endfor %}{% endfor %}")
    messages = [{"role": "user", "content": [{"type": "text", "text": "a"},
                                             {"type": "text", "text": "b"}]}]
    assert ChatTemplate(template).render(messages) == "[text:a][text:b]"


def test_generation_tag_renders_its_body():
    template = ("{% for m in messages %}{% generation %}<{{ m.content }}>{% endgeneration %}"
                "{% endfor %}")
    assert ChatTemplate(template).render([{"role": "assistant", "content": "x"}]) == "<x>"


def test_extra_variables_reach_the_template():
    template = "{% if enable_thinking is defined and not enable_thinking %}/no_think{% endif %}"
    assert ChatTemplate(template).render([], enable_thinking=False) == "/no_think"
    assert ChatTemplate(template).render([]) == ""


def test_syntax_error_is_raised_at_compile_time():
    with pytest.raises(jinja2.TemplateSyntaxError):
        ChatTemplate("{% for m in messages %}")
