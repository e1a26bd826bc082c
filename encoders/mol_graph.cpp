// The "kiban" graph features of one molecule, read from RDKit's binary pickle (Mol.ToBinary()).
//
// graph_matrices in molecule.py calls RDKit's Python getters once per atom and bond property; those
// calls are most of its time. The pickle RDKit writes in about a tenth of that time already holds
// every property the features need (atomic number, aromaticity, formal charge, chiral tag,
// hybridization, explicit Hs and implicit valence per atom; ends, type, stereo and conjugation per
// bond; the rings), so this file reads it and writes the same float32 rows the getters would give.
//
// The layout read is RDKit's pickle version 16 (MolPickler.cpp, _pickle / _pickleAtomData /
// _pickleBond / _pickleSSSR). Anything this reader does not handle, it refuses rather than guesses:
// another pickle version, query atoms or bonds, atom map numbers, dummy labels, monomer info,
// isotopes (their mass needs RDKit's isotope table), a molecule without ring information. The
// caller then runs the getters. A pickle that ends early or names an atom out of range is malformed.
//
// Derived values, as RDKit defines them (Atom.cpp):
//   GetTotalNumHs()  = explicit Hs + (noImplicit ? 0 : implicit valence)
//   GetTotalDegree() = bonds to the atom + GetTotalNumHs()
//   GetMass()        = the element's atomic weight (isotope 0)
//   IsInRing()       = the atom (bond) is in a ring of the ring information

#include <cstdint>
#include <cstring>
#include <vector>

namespace {

// MolPickler::Tags values of version 16
constexpr uint8_t BEGINATOM = 1, BEGINBOND = 11, BEGINSSSR = 20, BEGINSYMMSSSR = 66, BEGINFASTFIND = 67,
                  BEGINFINDOTHERORUNKNOWN = 68;
constexpr int32_t ENDIAN_ID = static_cast<int32_t>(0xDEADBEEF);
constexpr int HYBRIDIZATION_SP3 = 4;  // a pickle omits the hybridization when it is SP3

constexpr int OK = 0, UNSUPPORTED = 1, MALFORMED = -1;

struct Tables {
    const int64_t* atom_columns = nullptr;  // molecule.py's _ATOM_COLUMNS (all six tables end to end)
    int64_t atom_starts[6] = {};
    int64_t atom_sizes[6] = {};
    int64_t atom_shifts[6] = {};
    int64_t atom_flags = 0, atom_dim = 0;
    const double* weights = nullptr;  // atomic weight by atomic number
    int64_t n_weights = 0;
    const int64_t* bond_columns = nullptr;  // _BOND_COLUMNS: bond type table, then stereo table
    int64_t bond_size = 0, bond_flags = 0, bond_dim = 0;
} tables;

struct Reader {
    const uint8_t* data;
    int64_t size, at = 0;
    bool bad = false;

    template <typename V>
    V read() {
        V value{};
        if (at + static_cast<int64_t>(sizeof(V)) > size) {
            bad = true;
            return value;
        }
        std::memcpy(&value, data + at, sizeof(V));
        at += sizeof(V);
        return value;
    }
};

struct Atom {
    int64_t z, charge, chiral, hybridization, hs, degree;
    bool aromatic, ring;
};

struct Bond {
    int64_t begin, end, type, stereo;
    bool conjugated, ring;
};

int64_t clamp(int64_t v, int64_t size) { return v < 0 ? 0 : (v >= size ? size - 1 : v); }

template <typename T>
int read_graph(Reader& in, int64_t n_atoms, int64_t n_bonds, std::vector<Atom>& atoms, std::vector<Bond>& bonds) {
    if (in.read<uint8_t>() != BEGINATOM) return in.bad ? MALFORMED : UNSUPPORTED;
    atoms.resize(n_atoms);
    for (auto& atom : atoms) {
        atom.z = in.read<uint8_t>();
        const uint8_t flags = in.read<uint8_t>();
        // coordinates (old pickles), query, map number, dummy label, monomer info: not read here
        if (flags & (0x80 | 0x10 | 0x08 | 0x04 | 0x02)) return UNSUPPORTED;
        atom.aromatic = flags & 0x40;
        const bool no_implicit = flags & 0x20;
        const int32_t props = in.read<int32_t>();
        if (props & ~0xFE) return in.bad ? MALFORMED : UNSUPPORTED;  // old float mass, isotope, unknown bits
        atom.charge = (props & (1 << 1)) ? in.read<int8_t>() : 0;
        atom.chiral = (props & (1 << 2)) ? in.read<uint8_t>() : 0;
        atom.hybridization = (props & (1 << 3)) ? in.read<uint8_t>() : HYBRIDIZATION_SP3;
        const int64_t explicit_hs = (props & (1 << 4)) ? in.read<int8_t>() : 0;
        if (props & (1 << 5)) in.read<int8_t>();  // explicit valence
        const int64_t implicit_valence = (props & (1 << 6)) ? in.read<int8_t>() : 0;
        if (props & (1 << 7)) in.read<uint8_t>();  // radical electrons
        atom.hs = explicit_hs + (no_implicit ? 0 : implicit_valence);
        atom.degree = 0;
        atom.ring = false;
        if (in.bad) return MALFORMED;
    }
    if (in.read<uint8_t>() != BEGINBOND) return in.bad ? MALFORMED : UNSUPPORTED;
    bonds.resize(n_bonds);
    for (auto& bond : bonds) {
        bond.begin = in.read<T>();
        bond.end = in.read<T>();
        const uint8_t flags = in.read<uint8_t>();
        if (flags & (0x10 | 0x01)) return in.bad ? MALFORMED : UNSUPPORTED;  // query, mol-file end points
        bond.conjugated = flags & 0x20;
        bond.type = (flags & (1 << 3)) ? in.read<uint8_t>() : 1;  // SINGLE when omitted
        if (flags & (1 << 2)) in.read<uint8_t>();                 // bond direction
        bond.stereo = 0;
        if (flags & (1 << 1)) {
            bond.stereo = in.read<uint8_t>();
            const uint8_t stereo_atoms = in.read<uint8_t>();
            for (uint8_t k = 0; k < stereo_atoms; ++k) in.read<T>();
        }
        bond.ring = false;
        if (in.bad || bond.begin < 0 || bond.begin >= n_atoms || bond.end < 0 || bond.end >= n_atoms) return MALFORMED;
        ++atoms[bond.begin].degree;
        ++atoms[bond.end].degree;
    }
    const uint8_t tag = in.read<uint8_t>();
    if (tag != BEGINSSSR && tag != BEGINSYMMSSSR && tag != BEGINFASTFIND && tag != BEGINFINDOTHERORUNKNOWN) {
        return in.bad ? MALFORMED : UNSUPPORTED;  // no ring information: RDKit would have to find the rings
    }
    const uint32_t rings = in.read<uint32_t>();
    std::vector<int64_t> ring;
    for (uint32_t r = 0; r < rings && !in.bad; ++r) {
        const int64_t size = static_cast<int64_t>(in.read<T>());
        if (size <= 0 || size > n_atoms) return MALFORMED;
        ring.resize(size);
        for (auto& a : ring) {
            a = static_cast<int64_t>(in.read<T>());
            if (in.bad || a < 0 || a >= n_atoms) return MALFORMED;
            atoms[a].ring = true;
        }
        for (int64_t k = 0; k < size; ++k) {  // the bonds between ring neighbours, the last to the first
            const int64_t a = ring[k], b = ring[(k + 1) % size];
            for (auto& bond : bonds) {
                if ((bond.begin == a && bond.end == b) || (bond.begin == b && bond.end == a)) {
                    bond.ring = true;
                    break;
                }
            }
        }
    }
    return in.bad ? MALFORMED : OK;
}

}  // namespace

extern "C" {

// The one-hot tables of molecule.py, kept by pointer: the caller keeps the arrays alive.
void kiban_mol_graph_tables(const int64_t* atom_columns, const int64_t* atom_starts, const int64_t* atom_sizes,
                            const int64_t* atom_shifts, int64_t atom_flags, int64_t atom_dim, const double* weights,
                            int64_t n_weights, const int64_t* bond_columns, int64_t bond_size, int64_t bond_flags,
                            int64_t bond_dim) {
    tables.atom_columns = atom_columns;
    for (int k = 0; k < 6; ++k) {
        tables.atom_starts[k] = atom_starts[k];
        tables.atom_sizes[k] = atom_sizes[k];
        tables.atom_shifts[k] = atom_shifts[k];
    }
    tables.atom_flags = atom_flags;
    tables.atom_dim = atom_dim;
    tables.weights = weights;
    tables.n_weights = n_weights;
    tables.bond_columns = bond_columns;
    tables.bond_size = bond_size;
    tables.bond_flags = bond_flags;
    tables.bond_dim = bond_dim;
}

// Fill atoms [n_atoms, atom_dim], edge_index [2, 2 n_bonds] and bonds [2 n_bonds, bond_dim] (bond k
// as edges 2k, begin -> end, and 2k + 1, end -> begin) from one pickle.
// Returns 0, 1 where the pickle holds something this reader does not handle, -1 where it is malformed.
int kiban_mol_graph(const uint8_t* pickle, int64_t length, int64_t n_atoms, int64_t n_bonds, float* atom_out,
                    int64_t* edge_out, float* bond_out) {
    if (tables.atom_columns == nullptr) return UNSUPPORTED;
    Reader in{pickle, length};
    if (in.read<int32_t>() != ENDIAN_ID || in.read<int32_t>() != 0) return in.bad ? MALFORMED : UNSUPPORTED;
    const int32_t major = in.read<int32_t>();
    in.read<int32_t>();  // minor
    in.read<int32_t>();  // patch
    if (in.bad) return MALFORMED;
    if (major != 16) return UNSUPPORTED;
    if (in.read<int32_t>() != n_atoms || in.read<int32_t>() != n_bonds) return MALFORMED;
    in.read<uint8_t>();  // the "coordinates are in conformers" flag
    std::vector<Atom> atoms;
    std::vector<Bond> bonds;
    // atom indices are one byte while both counts fit one (MolPickler::pickleMol), else four
    const int status = (n_atoms > 255 || n_bonds > 255) ? read_graph<int32_t>(in, n_atoms, n_bonds, atoms, bonds)
                                     : read_graph<uint8_t>(in, n_atoms, n_bonds, atoms, bonds);
    if (status != OK) return status;
    for (const auto& atom : atoms) {
        if (atom.z >= tables.n_weights) return UNSUPPORTED;
    }

    const Tables& t = tables;
    std::memset(atom_out, 0, sizeof(float) * n_atoms * t.atom_dim);
    for (int64_t i = 0; i < n_atoms; ++i) {
        const Atom& a = atoms[i];
        float* row = atom_out + i * t.atom_dim;
        const int64_t values[6] = {a.z, a.degree + a.hs, a.charge, a.chiral, a.hs, a.hybridization};
        for (int k = 0; k < 6; ++k) {
            row[t.atom_columns[t.atom_starts[k] + clamp(values[k] + t.atom_shifts[k], t.atom_sizes[k])]] = 1.0f;
        }
        row[t.atom_flags] = a.aromatic ? 1.0f : 0.0f;
        row[t.atom_flags + 1] = a.ring ? 1.0f : 0.0f;
        row[t.atom_flags + 2] = static_cast<float>(t.weights[a.z] * 0.01);  // in double, then float: as numpy
    }
    std::memset(bond_out, 0, sizeof(float) * 2 * n_bonds * t.bond_dim);
    const int64_t edges = 2 * n_bonds;
    for (int64_t k = 0; k < n_bonds; ++k) {
        const Bond& b = bonds[k];
        float* row = bond_out + 2 * k * t.bond_dim;
        row[t.bond_columns[clamp(b.type, t.bond_size)]] = 1.0f;
        row[t.bond_columns[t.bond_size + clamp(b.stereo, t.bond_size)]] = 1.0f;
        row[t.bond_flags] = b.conjugated ? 1.0f : 0.0f;
        row[t.bond_flags + 1] = b.ring ? 1.0f : 0.0f;
        std::memcpy(row + t.bond_dim, row, sizeof(float) * t.bond_dim);
        edge_out[2 * k] = b.begin;
        edge_out[2 * k + 1] = b.end;
        edge_out[edges + 2 * k] = b.end;
        edge_out[edges + 2 * k + 1] = b.begin;
    }
    return OK;
}

}  // extern "C"
