// Lists the operators a TorchScript archive's code can run, without running any of it.
//
// torch::jit::load unpickles data.pkl and calls each object's `__setstate__` as it goes, so it
// runs the archive's own code before anyone could look at it. This file reads the archive the
// way torch::jit::load does (the same zip reader, the same SourceImporter over code/, the same
// unpickler for constants.pkl and data.pkl, so it sees the same classes), except that objects
// are built without calling `__setstate__`. Every method of every class the pickles name, and
// every function the compilation unit comes to hold, is then compiled (never run), its calls
// inlined, and its node kinds listed.
//
// Calls are inlined from the callees' unoptimised graphs: Inline() takes `optimized_graph()`,
// whose constant propagation evaluates operators whose inputs are constants, which would run
// some of the archive's operators while checking it.
//
// The answer is text, one entry a line, `TAG\tTEXT`:
//   M <function>   a function checked; the O lines after it are its node kinds
//   O <kind>       a node kind, such as aten::linear or prim::If
//   F <function>   a method of a class the pickles name that is not TorchScript (C++ code)
//   E <message>    the archive could not be read or compiled (the only line)

#include <caffe2/serialize/inline_container.h>
#include <caffe2/serialize/read_adapter_interface.h>
#include <torch/csrc/jit/api/compilation_unit.h>
#include <torch/csrc/jit/api/function_impl.h>
#include <torch/csrc/jit/frontend/source_range.h>
#include <torch/csrc/jit/ir/ir.h>
#include <torch/csrc/jit/mobile/file_format.h>
#include <torch/csrc/jit/serialization/import_read.h>
#include <torch/csrc/jit/serialization/import_source.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <set>
#include <sstream>
#include <string>
#include <unordered_set>
#include <vector>

namespace {

using caffe2::serialize::PyTorchStreamReader;
using caffe2::serialize::ReadAdapterInterface;
using torch::jit::Block;
using torch::jit::Function;
using torch::jit::Graph;
using torch::jit::GraphFunction;
using torch::jit::Node;

// Past this many nodes in one function after inlining, the archive is refused rather than
// checked: calls nested to make the inlined graph grow exponentially would otherwise exhaust
// the checker.
constexpr size_t kMaxNodes = 2'000'000;

// The archive, already in memory: the checker reads no file.
class MemoryAdapter final : public ReadAdapterInterface {
 public:
  MemoryAdapter(const uint8_t* data, size_t size) : data_(data), size_(size) {}
  size_t size() const override { return size_; }
  size_t read(uint64_t pos, void* buf, size_t n, const char* /*what*/) const override {
    if (pos >= size_) {
      return 0;
    }
    size_t count = std::min<uint64_t>(n, size_ - pos);
    std::memcpy(buf, data_ + pos, count);
    return count;
  }

 private:
  const uint8_t* data_;
  size_t size_;
};

// Where torch::jit::load looks for a qualifier's source: code/a/b/c.py for `a.b.c`.
std::shared_ptr<torch::jit::Source> find_source(PyTorchStreamReader& reader, const std::string& qualifier) {
  std::string path = qualifier;
  std::replace(path.begin(), path.end(), '.', '/');
  path = "code/" + path + ".py";
  if (!reader.hasRecord(path)) {
    return nullptr;
  }
  auto [data, size] = reader.getRecord(path);
  return std::make_shared<torch::jit::Source>(
      std::string_view(static_cast<const char*>(data.get()), size), path, 1);
}

void count_nodes(Block* block, size_t& count) {
  for (Node* node : block->nodes()) {
    if (++count > kMaxNodes) {
      return;
    }
    for (Block* inner : node->blocks()) {
      count_nodes(inner, count);
    }
  }
}

// The TorchScript function a call node calls, when it is one that can be inlined.
GraphFunction* callee(Node* node) {
  if (node->kind() == c10::prim::CallFunction) {
    Node* constant = node->input(0)->node();
    if (constant->kind() != c10::prim::Constant) {
      return nullptr;
    }
    auto type = constant->output()->type()->cast<c10::FunctionType>();
    return type ? torch::jit::tryToGraphFunction(*type->function()) : nullptr;
  }
  if (node->kind() == c10::prim::CallMethod) {
    auto type = node->input(0)->type()->cast<c10::ClassType>();
    if (!type) {
      return nullptr;
    }
    Function* method = type->findMethod(node->s(c10::attr::name));
    return method ? torch::jit::tryToGraphFunction(*method) : nullptr;
  }
  return nullptr;
}

// One round of inlining: every call found is replaced by its callee's body; the bodies' own calls
// wait for the next round. Returns whether anything was inlined.
bool inline_round(Block* block) {
  bool changed = false;
  for (auto it = block->nodes().begin(); it != block->nodes().end();) {
    Node* node = *it++;
    if (GraphFunction* function = callee(node)) {
      function->ensure_defined();
      if (node->kind() == c10::prim::CallFunction) {
        node->removeInput(0);
      }
      torch::jit::inlineCallTo(node, function, function->graph().get());
      changed = true;
      continue;
    }
    for (Block* inner : node->blocks()) {
      changed |= inline_round(inner);
    }
    for (c10::Symbol name : node->attributeNames()) {
      if (node->kindOf(name) == torch::jit::AttributeKind::g) {
        changed |= inline_round(node->g(name)->block());
      } else if (node->kindOf(name) == torch::jit::AttributeKind::gs) {
        for (const auto& graph : node->gs(name)) {
          changed |= inline_round(graph->block());
        }
      }
    }
  }
  return changed;
}

void collect_kinds(Block* block, std::set<std::string>& kinds) {
  for (Node* node : block->nodes()) {
    kinds.insert(node->kind().toQualString());
    for (Block* inner : node->blocks()) {
      collect_kinds(inner, kinds);
    }
    for (c10::Symbol name : node->attributeNames()) {
      if (node->kindOf(name) == torch::jit::AttributeKind::g) {
        collect_kinds(node->g(name)->block(), kinds);
      } else if (node->kindOf(name) == torch::jit::AttributeKind::gs) {
        for (const auto& graph : node->gs(name)) {
          collect_kinds(graph->block(), kinds);
        }
      }
    }
  }
}

// Names come from the archive: keep each on its line.
std::string one_line(const std::string& text) {
  std::string out = text.substr(0, 4000);
  for (char& c : out) {
    if (static_cast<unsigned char>(c) < 0x20 || c == 0x7f) {
      c = ' ';
    }
  }
  return out;
}

std::string scan(const uint8_t* data, size_t size) {
  // torch::jit::load picks its reader by these bytes, and reads a flatbuffer module (or a
  // torch.save pickle) by other rules than the ones mirrored here: only zip archives are checked.
  if (size < torch::jit::kFileFormatHeaderSize ||
      torch::jit::getFileFormat(reinterpret_cast<const char*>(data)) != torch::jit::FileFormat::ZipFileFormat) {
    return "E\tnot a TorchScript zip archive (torch.jit.save's format); flatbuffer and torch.save files are not accepted\n";
  }
  auto reader = std::make_shared<PyTorchStreamReader>(std::make_shared<MemoryAdapter>(data, size));
  if (reader->hasRecord("model.json")) {
    return "E\tthe archive is in the legacy TorchScript format (model.json), which is not accepted\n";
  }
  auto cu = std::make_shared<torch::jit::CompilationUnit>();
  std::vector<c10::IValue> constants;
  torch::jit::SourceImporter importer(
      cu, &constants, [&](const std::string& qualifier) { return find_source(*reader, qualifier); },
      reader->version());

  std::vector<c10::TypePtr> named;
  auto resolve = [&](const c10::QualifiedName& name) {
    c10::TypePtr type = importer.loadType(name);
    named.push_back(type);
    return c10::StrongTypePtr(cu, std::move(type));
  };
  // What torch::jit::load does but for `__setstate__`: the object is made, its state is not set.
  auto make = [](const at::StrongTypePtr& type, c10::IValue /*state*/) {
    auto cls = type.type_->expect<c10::ClassType>();
    return c10::ivalue::Object::create(type, cls->numAttributes());
  };
  auto read = [&](const std::string& archive) {
    return torch::jit::readArchiveAndTensors(archive, "", "", resolve, make, at::Device(at::kCPU), *reader);
  };
  // Held while its elements are copied out: a range-for over a temporary's member would not keep
  // the temporary alive.
  c10::IValue constant_tuple = read("constants");
  for (const auto& constant : constant_tuple.toTupleRef().elements()) {
    constants.push_back(constant);
  }
  read("data");

  // Every method of every class the pickles named (its `__setstate__` runs at load, `forward` at
  // inference, any other when called), its hooks and properties, and every function compiled.
  std::vector<Function*> functions;
  std::unordered_set<Function*> listed;
  std::ostringstream out;
  auto add = [&](Function* function) {
    if (function != nullptr && listed.insert(function).second) {
      functions.push_back(function);
    }
  };
  for (const auto& type : named) {
    auto cls = type->cast<c10::ClassType>();
    if (!cls) {
      continue;
    }
    std::vector<Function*> own(cls->methods());
    for (Function* hook : cls->getForwardHooks()) {
      own.push_back(hook);
    }
    for (Function* hook : cls->getForwardPreHooks()) {
      own.push_back(hook);
    }
    for (const auto& property : cls->properties()) {
      own.push_back(property.getter);
      own.push_back(property.setter);
    }
    for (Function* function : own) {
      if (function == nullptr) {
        continue;
      }
      if (torch::jit::tryToGraphFunction(*function) == nullptr) {
        out << "F\t" << one_line(function->qualname().qualifiedName()) << '\n';
      } else {
        add(function);
      }
    }
  }
  // Compiling a function imports the classes it names, whose methods can run without a call
  // node to inline (list.sort() calls `__lt__`): new functions are taken in until none appear.
  for (size_t next = 0;;) {
    for (Function* function : cu->get_functions()) {
      add(function);
    }
    if (next == functions.size()) {
      break;
    }
    Function* function = functions[next++];
    GraphFunction* graph_function = torch::jit::tryToGraphFunction(*function);
    if (graph_function == nullptr) {
      out << "F\t" << one_line(function->qualname().qualifiedName()) << '\n';
      continue;
    }
    graph_function->ensure_defined();
    std::shared_ptr<Graph> graph = graph_function->graph()->copy();
    for (;;) {
      size_t nodes = 0;
      count_nodes(graph->block(), nodes);
      if (nodes > kMaxNodes) {
        return "E\t" + one_line(function->qualname().qualifiedName()) +
            " has more than " + std::to_string(kMaxNodes) + " nodes once its calls are inlined\n";
      }
      if (!inline_round(graph->block())) {
        break;
      }
    }
    std::set<std::string> kinds;
    collect_kinds(graph->block(), kinds);
    out << "M\t" << one_line(function->qualname().qualifiedName()) << '\n';
    for (const std::string& kind : kinds) {
      out << "O\t" << one_line(kind) << '\n';
    }
  }
  return out.str();
}

char* copy_out(const std::string& text) {
  char* buffer = static_cast<char*>(std::malloc(text.size() + 1));
  if (buffer != nullptr) {
    std::memcpy(buffer, text.c_str(), text.size() + 1);
  }
  return buffer;
}

}  // namespace

extern "C" {

// Scans the `size` bytes at `data`. Returns the answer described at the top, in a buffer to give
// back to torchscan_free; NULL only when that buffer could not be allocated.
char* torchscan_scan(const uint8_t* data, size_t size) {
  try {
    return copy_out(scan(data, size));
  } catch (const c10::Error& e) {
    return copy_out("E\t" + one_line(e.what_without_backtrace()) + "\n");
  } catch (const std::exception& e) {
    return copy_out("E\t" + one_line(e.what()) + "\n");
  } catch (...) {
    return copy_out("E\tthe archive could not be read (an unknown C++ exception)\n");
  }
}

void torchscan_free(char* buffer) {
  std::free(buffer);
}

}  // extern "C"
