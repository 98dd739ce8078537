// Render the first turn of a chat the way llama-cli does: the GGUF's own chat template,
// through llama.cpp's own Jinja engine and chat code, with the model's BOS/EOS tokens.
#include "chat.h"
#include "llama.h"

#include <fstream>
#include <iostream>
#include <iterator>

int main(int argc, char ** argv) {
    if (argc != 3) { std::cerr << "usage: render_prompt MODEL.gguf MESSAGE_FILE\n"; return 2; }
    llama_backend_init();
    auto params = llama_model_default_params();
    params.vocab_only = true;
    llama_model * model = llama_model_load_from_file(argv[1], params);
    if (!model) { return 1; }
    std::ifstream file(argv[2]);
    std::string text((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
    auto templates = common_chat_templates_init(model, "");
    common_chat_templates_inputs inputs;
    common_chat_msg message;
    message.role = "user";
    message.content = text;
    inputs.messages.push_back(message);
    inputs.add_generation_prompt = true;
    inputs.use_jinja = true;
    std::cout << common_chat_templates_apply(templates.get(), inputs).prompt;
    llama_model_free(model);
    return 0;
}
